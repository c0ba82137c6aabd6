"""Webhooks: signed job events (Standard Webhooks) POSTed to the URL a submit named when the job ends.

``addresses`` refuses URLs that point into the gateway's own network; ``delivery`` is each gateway's
background loop that signs and sends the events from the job store's outbox.
"""
