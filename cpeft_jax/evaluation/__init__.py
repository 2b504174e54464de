"""Evaluation of trained workdirs: caption perplexity (perplexity), generation under jit with a
KV cache (generate), COCO caption metrics (captions), whole splits and their files (captioning),
attention heatmaps (heatmaps) and the table across workdirs (compare)."""
