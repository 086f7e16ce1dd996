"""Losses: the neural harmonizer's alignment term (:mod:`harmonization`) and PAG's cosine gradient
loss (:mod:`pag`), as small pure functions of arrays."""
