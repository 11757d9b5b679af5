"""Safe model rollout on the device: a verified model store with active/candidate pointers,
canary cohorts, shadow runs, blue-green activation with probation and automatic rollback, and
the rollout commands that drive them. The service only wires these parts in; every decision
about models lives here.
"""
