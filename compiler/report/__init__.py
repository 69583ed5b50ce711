"""What a compile did, as data (saved as JSON) and as views: terminal tables, HTML, pictures.
"""
