"""The linear algebra that both the method and the bank files use, on a floor below both.

``projector`` (null space of earlier bases, optionally inside a lease's block; overlap checks of
column blocks), ``factors`` (LoRA factor pairs and their exact composition) and ``moments``
(products with a low-rank second moment from stored eigenpairs). Pure torch: it imports nothing
else of SeqLoRA, so ``method/`` and ``bank/`` both import from here and never from each other
for maths (``tests/test_layering.py``).
"""
