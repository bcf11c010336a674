"""lance_model/io: media in and out: decoding images and videos, input checks, validation helpers, writers."""
