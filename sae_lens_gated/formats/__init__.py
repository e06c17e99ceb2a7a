"""On-disk formats of gated SAEs, one module each.

- :mod:`sae_lens_gated.formats.saelens`: SAELens folders (``cfg.json`` +
  ``sae_weights.safetensors``).
- :mod:`sae_lens_gated.formats.dictionary_learning`: dictionary_learning / SAEBench folders
  (``ae.pt`` + ``config.json``).
- :mod:`sae_lens_gated.formats.validation`: the checks both readers share and the errors
  they raise.
- :mod:`sae_lens_gated.formats.hub`: fetching a format's files from a Hugging Face repo.

Each reader is also a SAELens converter, usable as
``SAE.load_from_disk(path, converter=...)``.
"""
