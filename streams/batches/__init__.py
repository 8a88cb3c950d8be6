"""The batch path: the providers' batch APIs (:mod:`.clients`) and the open batches (:mod:`.jobs`)."""
