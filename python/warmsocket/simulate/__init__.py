"""`warmsocket simulate-upstream`: a fake OpenAI-compatible inference server for tests.

It speaks Chat Completions and the Responses API (HTTP, streaming or not, and
WebSocket mode), answers with the built-in model's rules (`warmsocket.mockmodel`),
keeps a prefix cache over token blocks like an inference engine, charges time with
a latency model, and reports what it received at `GET /stats`.
"""
