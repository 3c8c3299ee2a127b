"""Files and encoders around the DiT: audio, wav2vec2, images, the VAE, umT5, video, weight files."""
