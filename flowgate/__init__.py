"""flowgate: start long-running BPMN processes over plain HTTP.

What a user installs lives under this one name. The public, stable surface:

* :mod:`flowgate.handlers`: what a handler author writes against (processes, steps, the
  task context, the errors a handler may raise);
* :mod:`flowgate.embed`: the API as an ASGI app and the worker as a coroutine, for a team
  that runs them inside its own process;
* :mod:`flowgate.testing`: a handler run as a worker would run it, without the stack, for
  a team's own tests;
* the console scripts ``flowgate-api``, ``flowgate-worker``, ``flowgate-flusher`` and
  ``flowgate-deploy``.

Everything else (``flowgate.services``, ``flowgate.shared``) is the implementation and may
change between releases. In the repository those two are the top-level ``services/`` and
``shared/`` folders, linked here: the folder layout shows the architecture, and the
installed package shows one name.
"""
