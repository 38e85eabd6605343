"""Array API namespaces for the array libraries that array-api-compat does not cover.

One module per library, named after it, in the manner of array-api-compat's per-library modules
(``array_api_compat.torch``, ...). Each maps the Array API functions gradnorm's rules use onto the
library's own ops. They are compatibility shims of the core, not adapters: nothing here imports an
adapter (``gradnorm.torch``, ``gradnorm.jax``, ``gradnorm.tf``), and a module here imports its
library, so it must only be imported once that library is already loaded. `gradnorm._backend` is the
one place that does that, after finding the library in ``sys.modules``.

* `tensorflow`: ``tf.Tensor`` and ``tf.Variable`` (re-exported as ``gradnorm.tf.namespace``).
"""
