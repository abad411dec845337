"""The parallel runtime: a child process that runs jobs by name (:mod:`~.child`), its CPU throttle
(:mod:`~.throttle`), pools of such children kept between calls (:mod:`~.pool`), and arrays shared
with them through mapped files (:mod:`~.shared_arrays`). It knows nothing of what the jobs compute.
"""
