"""AUTOMATIC1111 integration: the host adapter and the <seqlora:…> extra network. Thin over the core;
imported only inside A1111 (``modules`` is A1111's package)."""
