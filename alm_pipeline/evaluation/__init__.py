"""Evaluation of models and teacher caches (not training): bits per byte (:mod:`.bits_per_byte`), chunk
agreement with a teacher (:mod:`.agreement`), model loading (:mod:`.models`), the ``evaluate`` command as a
function (:mod:`.run`) and the plots of a training run (:mod:`.plots`)."""
