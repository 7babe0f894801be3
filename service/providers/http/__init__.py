"""providers/http"""
