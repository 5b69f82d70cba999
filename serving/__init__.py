"""serving: the HTTP face of a family (OpenAI-style API, exit choice by latency budget, `familial-serve`)."""
