"""AUTOMATIC1111 (ldm/sgm UNets, k-diffusion and CompVis samplers) as a host: SEG rows in its sampling
loop, T-SAM on its latent and text encoders. No WebUI imports: the glue in ``extension/webui`` passes
in what the WebUI provides."""
