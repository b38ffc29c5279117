"""Slurm launchers: render the slurm/*.sbatch templates for a recipe, submit them as a chain, follow it."""
