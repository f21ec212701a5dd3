"""Simulator interfaces for trained models."""
