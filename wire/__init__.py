"""The wire layer every process shares: frames, operations, channels; no client runtime."""
