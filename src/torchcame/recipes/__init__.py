"""Training recipes that compare CAME with AdamW, Adafactor and LAMB on small models.

``python -m torchcame.recipes.gpt``, ``...bert`` and ``...toy_mlp`` each train and write a
report folder (``report.md``, ``loss.png``, ``results.json``); ``torchcame demo`` runs the GPT
recipe with its defaults. The heavy dependencies (``transformers``, ``matplotlib``, ``tqdm``:
the ``[recipes]`` extra) are imported only when a recipe runs.
"""
