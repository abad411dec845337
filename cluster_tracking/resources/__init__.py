"""What a run may use: memory and time limits, and peak-memory estimates made before allocating."""
