"""The operator: reconciles FineTuneJobs into trainer Jobs (not named `operator`: that is a stdlib module)."""
