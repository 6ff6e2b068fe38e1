"""The self-check behind ``refattn verify``: the spec against the independent loop oracle.

Not the public verifier (that is :func:`refattn.testing.check_attention` and
:func:`refattn.testing.check_cache`, for other people's kernels): this checks
refattn itself, on every available backend, device and dtype. :mod:`.agreement`
measures one problem, one chunked sequence or one cache history against the
oracle; :mod:`.run` draws them, runs every case and prints the table.
"""
