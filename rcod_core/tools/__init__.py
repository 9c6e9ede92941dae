"""The tools built on the library: the ``rcod`` command (:mod:`.cli`), batch upscaling of files
(:mod:`.batch`), evaluation with the paper's metrics (:mod:`.evaluate`, :mod:`.metrics`) and the
benchmark (:mod:`.bench`). Library code never imports them."""
