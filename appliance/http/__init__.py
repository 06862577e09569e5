"""The HTTP/1.1 server: an asyncio Protocol on httptools, under uvloop where it is available."""
