"""The command-line tools (installed as console scripts by pip; also ``python -m experiments.*``).

  resmem-jax                    main.py: train (or reuse) a base model, memorize, report (images
                                and text; kNN-LM beside ResMem for language models)
  resmem-jax-train              train.py: train the base model only
  resmem-jax-model-size-sweep   model_size_sweep.py: base vs ResMem against model size
  resmem-jax-sample-size-sweep  sample_size_sweep.py: base vs ResMem against training-set size
  resmem-jax-theory             theory.py: the paper's stylized linear regression

Each takes ``--config=NAME`` (a packaged config: ``digits``, ``mnist:serving``, ...) or a config
file, any ``--config.section.field=value`` override, ``--print_config`` and ``--verbose``.
"""
