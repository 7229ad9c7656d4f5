"""One thin module per DVC stage: parse inputs, call the library, write outputs atomically."""
