"""Ray scale-out: a loopback-only local cluster launcher, model replicas as Ray actors, data-parallel training.

Ray is an optional extra (``pip install llmos[ray]``); nothing on the single-machine path imports this package, and
its modules import ``ray`` only inside functions, after :func:`llmos.distributed.cluster.ray_environment` has been
applied to the process.
"""
