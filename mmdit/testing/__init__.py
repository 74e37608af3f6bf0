"""Seeded random stand-ins of the SD3 components, for tests, benchmarks and the demo.

Never imported by training, eval or data code (the import-linter contracts in pyproject.toml
enforce it): the product loads real components from a directory, and this package only writes
such a directory whose weights are random, or fitted to a few images, so nothing has to be
downloaded.

- ``spec``: the widths SD3 fixes, the tiny sizes chosen here, folder names and random streams.
- ``captions``: the generated caption corpus the tiny T5 tokenizer is trained on.
- ``tokenizer_files``: the real CLIP BPE tokenizers and the tiny T5 SentencePiece tokenizer.
- ``text_encoders``: random CLIP-L, CLIP-bigG and T5 encoders with SD3's output widths.
- ``vae``: the random VAE and its fit to an image folder (``--fit-vae``).
- ``components``: the whole directory, ``make_tiny_components`` and the console script
  ``mmdit-make-tiny-components``.

transformers, diffusers, sentencepiece and safetensors are imported inside functions only, so
importing any of these modules stays cheap.
"""
