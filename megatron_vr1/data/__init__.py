"""The data layer: RL rows and prompts, cold-start SFT rows and packing (re-exported here), and the
tiny synthetic task (`megatron_vr1.data.synthetic`, not imported here so that
`python -m megatron_vr1.data.synthetic` runs cleanly)."""

from megatron_vr1.data.bad_rows import BadRow, LoadResult, SkipReport
from megatron_vr1.data.rl_dataset import (
    R1_ZERO_SYSTEM_PROMPT,
    PromptSampler,
    RLRow,
    build_prompt,
    load_rl_data,
    load_rl_rows,
)
from megatron_vr1.data.sft_dataset import (
    SequenceTooLong,
    SFTExample,
    SFTRow,
    encode_sft,
    encode_sft_rows,
    load_sft_data,
    load_sft_rows,
    pack_examples,
    pack_lengths,
)

__all__ = [
    "BadRow",
    "LoadResult",
    "PromptSampler",
    "R1_ZERO_SYSTEM_PROMPT",
    "RLRow",
    "SFTExample",
    "SFTRow",
    "SequenceTooLong",
    "SkipReport",
    "build_prompt",
    "encode_sft",
    "encode_sft_rows",
    "load_rl_data",
    "load_rl_rows",
    "load_sft_data",
    "load_sft_rows",
    "pack_examples",
    "pack_lengths",
]
