"""The kubetune operator: an informer cache of FineTuneJobs and their children, a work queue, and a
level-triggered reconcile (read from the cache -> pure `plan()` -> act -> one status patch)."""
