"""The reproduction harness: ``demo``, ``sweep`` and ``bench`` of the command line.

Experiments built on the library, not part of it: nothing outside this package imports it
(``import sae_lens_gated`` loads neither this package nor matplotlib).
"""
