"""The Faust boundary: everything that knows Faust (and its private members) is here.

* :mod:`streams.runtime.types`: the project's own interfaces, what roles see.
* :mod:`streams.runtime.worker`: one Faust app per role and the agent loop every role runs.
* :mod:`streams.runtime.transport`: Faust's aiokafka transport with tierstream's delivery rules.
* :mod:`streams.runtime.offsets`: the offset state machine the transport and the cost role share.

tests/test_runtime_boundary.py pins every Faust behaviour and member relied on here, so an
upgrade of faust-streaming shows at once what it broke.
"""
