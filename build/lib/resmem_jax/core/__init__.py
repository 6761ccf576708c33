"""The ResMem math as pure, jittable array functions: no I/O, no config, no memory objects.

  residuals.py   onehot(y) - softmax(z / T), regression residuals, the sparse top-m form
  predictor.py   base prediction, neighbour weights, the residual estimate, ResMem's prediction,
                 the kNN-LM mixture
  metrics.py     accuracy, squared loss, log loss (per row and as means)
  selection.py   the validation sweep over (k, sigma, T[, lambda]) from one neighbour query
"""
