#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, combined broker+controller) for local dev,
# tests and CI, run straight from Maven Central jars: no Docker engine and no
# tarball host are available on these machines.
#
# Ships inside the `streams` package (streams/broker_files/, next to its
# pom.xml), so `tierstream broker` runs it from a checkout or an installed
# wheel alike.
#
# Usage: kafka.sh {fetch|start|stop|status|clean|version|cache-dir}
#
# Environment (all optional):
#   KAFKA_VERSION          Kafka release to run (default below)
#   KAFKA_PORT             PLAINTEXT listener port (9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (KAFKA_PORT + 1)
#   KAFKA_SASL_PORT        if set, also a SASL_PLAINTEXT listener on
#                          127.0.0.1:<port> with mechanisms PLAIN and
#                          SCRAM-SHA-256 (unset: no SASL listener at all)
#   KAFKA_SASL_USERS       users of that listener, "alice:secret,bob:pw"
#                          (required with KAFKA_SASL_PORT). PLAIN users are
#                          rewritten on every start; SCRAM-SHA-256 users are
#                          created when the data dir is first formatted only.
#                          Names: [A-Za-z0-9._-]; passwords: [A-Za-z0-9._~!@#%^*()+:/?-]
#   KAFKA_DATA_DIR         config, logs, pid and log segments (<cache>/broker-<port>)
#   TIERSTREAM_CACHE       cache root for the jars and default data dirs; default:
#                          <checkout>/.cache when this script is in a source
#                          checkout, else ${XDG_CACHE_HOME:-~/.cache}/tierstream
#   KAFKA_HEAP             JVM heap flags (-Xmx1G -Xms256m)
#   KAFKA_JVM_OPTS         extra JVM flags appended after the defaults
#   KAFKA_LOG_LEVEL        root log level of the broker log file (INFO)
#   KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (90)
#   KAFKA_STOP_TIMEOUT     seconds to wait for a clean shutdown before SIGKILL (30)
#   TIERSTREAM_PYTHON      interpreter with aiokafka for the readiness probe
#                          (<checkout>/.venv/bin/python, else python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # .../streams/broker_files
PACKAGE="$(cd "$HERE/.." && pwd)"                      # .../streams: broker.py is there

# A source checkout has tierstream's pyproject.toml next to streams/; an
# installed package (site-packages/streams) has not.
CHECKOUT=""
if grep -qs '^name = "tierstream"' "$PACKAGE/../pyproject.toml"; then
    CHECKOUT="$(cd "$PACKAGE/.." && pwd)"
fi
if [[ -n "$CHECKOUT" ]]; then
    DEFAULT_CACHE="$CHECKOUT/.cache"
else
    DEFAULT_CACHE="${XDG_CACHE_HOME:-${HOME:?set HOME, XDG_CACHE_HOME or TIERSTREAM_CACHE}/.cache}/tierstream"
fi

DEFAULT_KAFKA_VERSION="4.4.0"
KAFKA_VERSION="${KAFKA_VERSION:-$DEFAULT_KAFKA_VERSION}"
CACHE="${TIERSTREAM_CACHE:-$DEFAULT_CACHE}"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
FETCH_MARKER="$KAFKA_HOME/.fetch-complete"
DEPENDENCY_PLUGIN_VERSION="3.8.1"

PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
DATA_DIR="${KAFKA_DATA_DIR:-$CACHE/broker-$PORT}"
PID_FILE="$DATA_DIR/kafka.pid"
CONFIG="$DATA_DIR/server.properties"
LOG4J_CONFIG="$DATA_DIR/log4j2.properties"
SERVER_LOG="$DATA_DIR/server.log"   # broker log written by log4j
STDOUT_LOG="$DATA_DIR/kafka.out"    # JVM stdout/stderr (crashes, bad flags)
META_LOG_DIR="$DATA_DIR/kraft-logs"
STATE_FILE="$DATA_DIR/broker.env"   # what this data dir was started with
FORMAT_ARGS="$DATA_DIR/format.args" # transient java @argfile holding SCRAM passwords

SASL_PORT="${KAFKA_SASL_PORT:-}"
SASL_NAMES=()
SASL_PASSWORDS=()

START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { local code="$1"; shift; log "$*"; exit "$code"; }

# ---------------------------------------------------------------- fetch

libs_complete() { [[ -f "$FETCH_MARKER" && -d "$LIBS" ]]; }

cmd_fetch() {
    if libs_complete; then
        log "Kafka $KAFKA_VERSION jars already in $LIBS"
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die 3 "mvn not found on PATH; it is needed to fetch Kafka from Maven Central"
    command -v java >/dev/null 2>&1 || die 3 "java not found on PATH; Kafka $KAFKA_VERSION needs Java 17+"
    mkdir -p "$KAFKA_HOME"

    # Parallel test workers may all call fetch at once; serialise them so only
    # one mvn run writes the libs dir and the others find the marker. The lock
    # fd lives only in this subshell so the broker JVM never inherits it.
    (
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        libs_complete && exit 0
        fetch_locked
    ) 9>"$KAFKA_HOME/.fetch.lock"
}

fetch_locked() {
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
    local tmp="$KAFKA_HOME/libs.partial"
    local mvn_log="$KAFKA_HOME/mvn.log"
    rm -rf "$tmp" "$LIBS"
    # Full plugin coordinates: a pinned, reproducible plugin, and without
    # network the error names the artifact it could not transfer instead of
    # a baffling "No plugin found for prefix 'dependency'".
    if ! mvn -B -q -f "$HERE/pom.xml" \
            "org.apache.maven.plugins:maven-dependency-plugin:$DEPENDENCY_PLUGIN_VERSION:copy-dependencies" \
            -Dkafka.version="$KAFKA_VERSION" \
            -DincludeScope=runtime \
            -DoutputDirectory="$tmp" >"$mvn_log" 2>&1; then
        # Show mvn's own words: "Could not transfer artifact ..." vs a bad
        # version ("Could not find artifact ...") need different fixes.
        log "mvn could not fetch Kafka $KAFKA_VERSION; mvn said:"
        sed 's/\x1b\[[0-9;]*m//g' "$mvn_log" | grep -F '[ERROR]' | grep -v '^\[ERROR\] *$' >&2 \
            || cat "$mvn_log" >&2
        rm -rf "$tmp"
        exit 3
    fi
    ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 \
        || die 3 "mvn succeeded but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp"
    mv "$tmp" "$LIBS"
    # Written last: a fetch interrupted before this line is redone next time.
    date -u +%FT%TZ >"$FETCH_MARKER"
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1))"
}

# ---------------------------------------------------------------- process helpers

# Prints the pid from the pid file if that process is alive and is *our*
# broker (pids get recycled; never signal a stranger).
running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-Dtierstream.kafka.datadir=$DATA_DIR " || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

python_for_probe() {
    local py
    for py in "${TIERSTREAM_PYTHON:-}" ${CHECKOUT:+"$CHECKOUT/.venv/bin/python"} python3; do
        [[ -n "$py" ]] || continue
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import aiokafka' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

# Asks the broker for metadata. Runs broker.py by path with -P so that
# neither streams/__init__.py (heavy app imports) nor the streams/ dir on
# sys.path (module names shadowing the stdlib) can break the probe.
probe_ready() {
    local timeout="$1" py
    if py="$(python_for_probe)"; then
        "$py" -P "$PACKAGE/broker.py" wait --bootstrap "127.0.0.1:$PORT" --timeout "$timeout" >/dev/null
    else
        # No aiokafka anywhere: an open listener is the best signal left.
        local deadline=$((SECONDS + ${timeout%.*}))
        until port_open "$PORT"; do
            ((SECONDS < deadline)) || return 1
            sleep 0.2
        done
    fi
}

show_log_tail() {
    local f
    for f in "$STDOUT_LOG" "$SERVER_LOG"; do
        [[ -s "$f" ]] || continue
        log "---- last lines of $f ----"
        tail -n 40 "$f" >&2
    done
}

# ---------------------------------------------------------------- config

# Splits KAFKA_SASL_USERS into SASL_NAMES / SASL_PASSWORDS. Messages name the
# user, never the password. The character sets keep every value safe to put
# verbatim in a JAAS string, a properties file and a StorageTool SCRAM spec.
parse_sasl_users() {
    [[ -n "$SASL_PORT" ]] || return 0
    if ! [[ "$SASL_PORT" =~ ^[0-9]+$ ]] || ((SASL_PORT < 1 || SASL_PORT > 65535)); then
        die 2 "KAFKA_SASL_PORT must be a TCP port number"
    fi
    ((SASL_PORT != PORT && SASL_PORT != CONTROLLER_PORT)) \
        || die 2 "KAFKA_SASL_PORT must differ from KAFKA_PORT and KAFKA_CONTROLLER_PORT"
    [[ -n "${KAFKA_SASL_USERS:-}" ]] \
        || die 2 "KAFKA_SASL_PORT is set but KAFKA_SASL_USERS is empty (e.g. KAFKA_SASL_USERS=alice:secret)"
    local entry name password
    local -a entries
    IFS=',' read -r -a entries <<<"$KAFKA_SASL_USERS"
    for entry in "${entries[@]}"; do
        [[ "$entry" == *:* ]] || die 2 "KAFKA_SASL_USERS: an entry has no ':' (expected name:password)"
        name="${entry%%:*}"
        password="${entry#*:}"
        [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] \
            || die 2 "KAFKA_SASL_USERS: user names may use only [A-Za-z0-9._-] and must not be empty"
        [[ "$password" =~ ^[A-Za-z0-9._~!@#%^*()+:/?-]+$ ]] \
            || die 2 "KAFKA_SASL_USERS: the password of user '$name' is empty or has a character outside [A-Za-z0-9._~!@#%^*()+:/?-]"
        SASL_NAMES+=("$name")
        SASL_PASSWORDS+=("$password")
    done
}

write_config() {
    mkdir -p "$DATA_DIR" "$META_LOG_DIR"
    if [[ -n "$SASL_PORT" ]]; then
        # The metadata log (and the format output in kafka.out) carry the SCRAM
        # salts and stored keys: keep the whole data dir private.
        chmod 700 "$DATA_DIR"
    fi
    local listeners="PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT"
    local advertised="PLAINTEXT://127.0.0.1:$PORT"
    local protocol_map="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if [[ -n "$SASL_PORT" ]]; then
        # An extra client listener only: inter-broker and controller traffic
        # stay on PLAINTEXT, so nothing that uses $PORT changes.
        listeners+=",SASL_PLAINTEXT://127.0.0.1:$SASL_PORT"
        advertised+=",SASL_PLAINTEXT://127.0.0.1:$SASL_PORT"
        protocol_map+=",SASL_PLAINTEXT:SASL_PLAINTEXT"
    fi
    # Rewritten on every start so edits here take effect; the KRaft metadata
    # itself lives in $META_LOG_DIR and survives. Mode 600: with a SASL
    # listener it holds the PLAIN passwords.
    rm -f "$CONFIG"
    (umask 077; cat >"$CONFIG") <<EOF
# Generated by tierstream's kafka.sh; rewritten on each start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocol_map
log.dirs=$META_LOG_DIR

# One node: every internal topic must make do with a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions: the first consumer group / transaction then
# creates its internal topic in well under a second on 2 cores.
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8

# Tests and the demo join groups right after creating topics; the default
# 3 s initial rebalance delay would only slow them down.
group.initial.rebalance.delay.ms=0
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true

# Sized for a 2-core machine shared with the app and the tests.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
    if [[ -n "$SASL_PORT" ]]; then
        local i jaas="org.apache.kafka.common.security.plain.PlainLoginModule required"
        for i in "${!SASL_NAMES[@]}"; do
            jaas+=" user_${SASL_NAMES[$i]}=\"${SASL_PASSWORDS[$i]}\""
        done
        cat >>"$CONFIG" <<EOF

# SASL_PLAINTEXT listener on loopback (KAFKA_SASL_PORT), for authentication
# tests. PLAIN users come from KAFKA_SASL_USERS on each start; SCRAM-SHA-256
# credentials live in the KRaft metadata, added when the storage was formatted.
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256
listener.name.sasl_plaintext.plain.sasl.jaas.config=$jaas;
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    fi

    local level="${KAFKA_LOG_LEVEL:-INFO}"
    cat >"$LOG4J_CONFIG" <<EOF
# Generated by tierstream's kafka.sh: broker log to a file only, so a
# backgrounded broker never writes over the terminal or test output.
status = warn
# Kafka stops log4j itself on exit; log4j's own hook would race it and
# complain that the JVM is already shutting down.
shutdownHook = disable
name = tierstream-kafka

appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $SERVER_LOG
appender.file.filePattern = $SERVER_LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2

rootLogger.level = $level
rootLogger.appenderRef.file.ref = FILE

# Per-request and per-partition state chatter drowns the useful lines.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF

    cat >"$STATE_FILE" <<EOF
KAFKA_VERSION=$KAFKA_VERSION
KAFKA_PORT=$PORT
KAFKA_CONTROLLER_PORT=$CONTROLLER_PORT
EOF
    if [[ -n "$SASL_PORT" ]]; then
        echo "KAFKA_SASL_PORT=$SASL_PORT" >>"$STATE_FILE"
    fi
}

java_cmd() {
    # shellcheck disable=SC2206  # word splitting of the flag strings is intended
    local heap=(${KAFKA_HEAP:--Xmx1G -Xms256m}) extra=(${KAFKA_JVM_OPTS:-})
    # GC flags are the ones Kafka's own kafka-run-class.sh uses.
    JAVA_ARGS=(
        java "${heap[@]}"
        -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
        -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$LOG4J_CONFIG"
        -Dkafka.logs.dir="$DATA_DIR"
        "${extra[@]}"
        -cp "$LIBS/*"
    )
}

# Formats the KRaft metadata log once; later starts reuse it, keeping topics
# and committed offsets.
format_storage() {
    if [[ -f "$META_LOG_DIR/meta.properties" ]]; then
        return 0
    fi
    java_cmd
    local cluster_id
    if ! cluster_id="$("${JAVA_ARGS[@]}" kafka.tools.StorageTool random-uuid 2>>"$STDOUT_LOG")"; then
        show_log_tail
        die 1 "could not run kafka.tools.StorageTool (java -cp '$LIBS/*')"
    fi
    log "formatting $META_LOG_DIR (cluster id $cluster_id)"
    # --standalone: this node is the sole voter of a dynamic (KIP-853) quorum,
    # matching controller.quorum.bootstrap.servers in server.properties.
    # SCRAM users go in through a java @argfile (mode 600, deleted at once)
    # so their passwords never show on a command line (ps, /proc/*/cmdline).
    rm -f "$FORMAT_ARGS"
    (umask 077; : >"$FORMAT_ARGS")
    {
        echo kafka.tools.StorageTool
        echo format
        echo --standalone
        echo --cluster-id
        echo "$cluster_id"
        echo --config
        echo "$CONFIG"
        echo --ignore-formatted
        local i
        for i in "${!SASL_NAMES[@]}"; do
            echo --add-scram
            echo "SCRAM-SHA-256=[name=${SASL_NAMES[$i]},password=${SASL_PASSWORDS[$i]}]"
        done
    } >>"$FORMAT_ARGS"
    if ((${#SASL_NAMES[@]} > 0)); then
        log "adding SCRAM-SHA-256 credentials for ${SASL_NAMES[*]}"
    fi
    local rc=0
    "${JAVA_ARGS[@]}" "@$FORMAT_ARGS" >>"$STDOUT_LOG" 2>&1 || rc=$?
    rm -f "$FORMAT_ARGS"
    if ((rc != 0)); then
        show_log_tail
        die 1 "formatting KRaft storage failed"
    fi
}

# ---------------------------------------------------------------- commands

cmd_start() {
    local pid
    if pid="$(running_pid)"; then
        if probe_ready "$START_TIMEOUT"; then
            log "already running (pid $pid) on 127.0.0.1:$PORT"
            return 0
        fi
        show_log_tail
        die 1 "broker pid $pid is alive but did not answer on 127.0.0.1:$PORT within ${START_TIMEOUT}s"
    fi
    rm -f "$PID_FILE"

    # Something else on our ports would make the JVM die with a bind error
    # deep in its log; say it plainly instead.
    parse_sasl_users
    local p
    for p in "$PORT" "$CONTROLLER_PORT" ${SASL_PORT:+"$SASL_PORT"}; do
        if port_open "$p"; then
            die 1 "port $p on 127.0.0.1 is already in use by another process"
        fi
    done

    cmd_fetch
    write_config
    format_storage
    java_cmd

    log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (controller $CONTROLLER_PORT${SASL_PORT:+, SASL_PLAINTEXT $SASL_PORT}), data in $DATA_DIR"
    local t0=$SECONDS
    # setsid: the broker outlives this script and is not hit by Ctrl-C sent
    # to the caller's process group. The inner shell writes its own pid and
    # execs java, so the pid file names the JVM itself.
    echo "---- start $(date -u +%FT%TZ) ----" >>"$STDOUT_LOG"
    # shellcheck disable=SC2016  # $$ and $@ are for the inner shell
    PID_FILE="$PID_FILE" nohup setsid bash -c 'echo $$ >"$PID_FILE"; exec "$@"' kafka \
        "${JAVA_ARGS[@]}" -Dtierstream.kafka.datadir="$DATA_DIR" kafka.Kafka "$CONFIG" \
        </dev/null >>"$STDOUT_LOG" 2>&1 &

    # Wait for the listener while watching the JVM, so a crash (bad flag,
    # port clash) fails in seconds instead of at the timeout.
    local deadline=$((SECONDS + ${START_TIMEOUT%.*}))
    until port_open "$PORT"; do
        if ((SECONDS >= deadline)); then
            show_log_tail
            die 1 "broker did not open 127.0.0.1:$PORT within ${START_TIMEOUT}s"
        fi
        if [[ -s "$PID_FILE" ]] && ! running_pid >/dev/null; then
            show_log_tail
            rm -f "$PID_FILE"
            die 1 "broker exited during startup"
        fi
        sleep 0.2
    done
    local remaining=$((deadline - SECONDS))
    ((remaining > 0)) || remaining=1
    if ! probe_ready "$remaining"; then
        show_log_tail
        die 1 "broker on 127.0.0.1:$PORT did not answer a metadata request within ${START_TIMEOUT}s"
    fi
    log "ready on 127.0.0.1:$PORT (pid $(cat "$PID_FILE"), $((SECONDS - t0))s)"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        log "not running (data dir $DATA_DIR)"
        return 0
    fi
    log "stopping pid $pid"
    # SIGTERM lets the broker flush segments and write a clean-shutdown
    # marker, so the next start skips log recovery.
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "pid $pid still alive after ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            break
        fi
        sleep 0.1
    done
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local version="$KAFKA_VERSION"
    if [[ -f "$STATE_FILE" ]]; then
        version="$(sed -n 's/^KAFKA_VERSION=//p' "$STATE_FILE")"
    fi
    local pid
    if pid="$(running_pid)"; then
        local answering="listening"
        port_open "$PORT" || answering="not listening yet"
        echo "running pid=$pid port=$PORT controller_port=$CONTROLLER_PORT version=$version data_dir=$DATA_DIR ($answering)"
        return 0
    fi
    echo "stopped port=$PORT version=$version data_dir=$DATA_DIR"
    return 1
}

cmd_clean() {
    cmd_stop
    [[ -d "$DATA_DIR" ]] || return 0
    # Guard against a mistyped KAFKA_DATA_DIR: only delete what looks like
    # a data dir this script created.
    if [[ -f "$CONFIG" || -f "$STATE_FILE" || -z "$(ls -A "$DATA_DIR")" ]]; then
        rm -rf "$DATA_DIR"
        log "removed $DATA_DIR"
    else
        die 1 "refusing to delete $DATA_DIR: it does not look like a kafka.sh data dir"
    fi
}

case "${1:-}" in
    fetch) cmd_fetch ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    clean) cmd_clean ;;
    version) echo "$KAFKA_VERSION" ;;
    cache-dir) echo "$CACHE" ;;
    *)
        echo "usage: $0 {fetch|start|stop|status|clean|version|cache-dir}" >&2
        exit 2
        ;;
esac
