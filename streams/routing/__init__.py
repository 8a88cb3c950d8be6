"""Routing: which tier answers a request. The strategies the classifier role runs
(``rules``, ``learned``), the learned router's training and file, and the evaluation of
any strategy on labelled data (``tierstream router eval``)."""
