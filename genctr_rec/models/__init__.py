"""The decoder, the CTR backbones and the two stage models built on SharedEmbeddings."""
