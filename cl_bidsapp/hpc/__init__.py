"""Running cl-bidsapp on clusters and in containers: SLURM job arrays and template pre-seeding.

``slurm`` writes and submits the job scripts of ``cl-bidsapp-slurm`` and reads back which
participants failed; ``templates`` puts the TemplateFlow files the group level needs where it
looks for them, so that compute nodes never need the network.
"""
