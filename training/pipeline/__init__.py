"""The LRA-EE build pipeline: split, profile, extract, train-heads, fit-gate, calibrate, evaluate (``lraee-train``)."""
