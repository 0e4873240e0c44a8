"""Sparrow's integration with stock SGLang (0.5.23), as a plugin: no fork, no edits to SGLang's files.

Registered through SGLang's entry points (pyproject `[project.entry-points]`):
- `sglang.srt.platforms` -> `sglang_patches.platform:activate`: an opt-in CPU platform
  (`SPARROW_SGLANG_CPU=1`), so CI serves real SGLang on machines without a GPU;
- `sglang.srt.plugins` -> `sglang_patches.plugin:register`: the `sparrow` attention backend
  (block top-k sparse decode), per-request schedules and the LoRA-on-CPU fix.
"""
