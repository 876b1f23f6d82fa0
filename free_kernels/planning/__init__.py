"""Round costs for the draft planner (:mod:`free_kernels.planner`, the policy):

* :mod:`.costs`: the prior cost model and the estimate the run's own timed rounds correct;
* :mod:`.calibration`: the few rounds timed before a setting's first run, CPU thread handling;
* :mod:`.cache`: the cost cache on disk (keys, validation on read, locked atomic merges).
"""
