"""The native API's shape, shared by its two entry points (`Engine.generate` and `POST /generate`): one request
normaliser (`GenerateInput`) and one result shape (`ResultCollector`)."""
