"""Cold-start data: modality bridging (Vision-R1) and the OpenVLThinker iterative loop.

- `bridge.run_bridge`: (image, question, answer) rows -> pseudo-CoT -> description -> text
  reasoning -> filters -> SFT rows, sharded and resumable (`megatron-vr1 coldstart CONFIG`).
- `backends`: offline vLLM or any OpenAI-compatible endpoint, behind one `generate`.
- `filters`: answer check (the reward's checker), consistency rules, phrase rewriting (pure).
- `regenerate.regenerate`: the RL model's k samples -> the shortest correct -> SFT rows.
- `loop.run_loop`: SFT -> GRPO -> regenerate, N rounds, each step skipped once done
  (`megatron-vr1 coldstart CONFIG --loop`).
"""
