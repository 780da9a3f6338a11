"""The pure, expensive half of a submission's path: decode, encode, fuse.

Media are decoded in capped worker processes (``sandbox``), encoded in
micro-batches off the event loop (``encoding``), and fused into the
quantized ``Prepared`` form that waits for its round (``prepare``).
"""
