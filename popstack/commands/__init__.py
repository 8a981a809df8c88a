"""The command lines: ``train`` (``popstack-train``, the repository's ``train.py``) and ``predict``
(``popstack-predict``, ``predict.py``)."""
