"""Zoology's baselines as bench mixers (BaseConv, Hyena, Based): registered under the catalogue's
``benchmark`` family so ``attnzoo compare --mixers`` can run the paper's comparison; they are not
catalogue mechanisms."""
