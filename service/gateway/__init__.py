"""The HTTP gateway: ``create_app(settings)`` (:mod:`~service.gateway.app`), the native routes, the
OpenAI-compatible layer (:mod:`~service.gateway.openai`), the web page, and the one mapping from
errors to HTTP answers (:mod:`~service.gateway.errors`).

It talks to the workers only through the job contract (:mod:`service.contract`) and never imports
torch, the worker or the model's network; from ``model`` it uses the torch-free rule set and media
probing only.
"""
