"""Operations: what a user asks imgkit to do. Each reads images through formats/ and views/ and writes through platform/'s checks."""
