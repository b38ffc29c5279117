"""Cold-start supervised fine-tuning (Vision-R1 step 1): `megatron-vr1 sft RECIPE`.

`run_sft(cfg, arch)` in `megatron_vr1.sft.loop` trains and returns the final checkpoint folder.
"""
