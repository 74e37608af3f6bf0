"""Slurm launching: submitit submission, sbatch templates, preemption-safe requeue."""
