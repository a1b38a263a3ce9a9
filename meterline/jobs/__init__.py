"""Offline jobs over stored data: rebuild a meter's windows (recompute) and replay dead letters.

Both turn stored events back into rows with the same pure `meterline.core.rows.message_rows` the live
processor uses, so their rows collapse with the live ones in ReplacingMergeTree.
"""
