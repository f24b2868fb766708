"""The Textual app behind `lva chat`: `LvaApp` composes the screens in `screens/` from the widgets in `widgets/`."""
