"""diffusers as a host: generation with SEG and T-SAM on a diffusers pipeline."""
